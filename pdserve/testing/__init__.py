"""Test doubles for pdserve. Nothing here is used for serving."""
