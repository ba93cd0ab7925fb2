"""The Flask and FastAPI apps the README shows, run by tests/test_recipes.py."""
