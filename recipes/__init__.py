"""The recipes shipped with diffit-toolkit (package data: ``diffit-toolkit train quickstart`` works from a wheel)."""
