"""API request/response models shared by the API and its client."""
