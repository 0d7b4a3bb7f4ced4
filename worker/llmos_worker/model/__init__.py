"""Llama-family model for paged attention, weight loading and the model runner."""
