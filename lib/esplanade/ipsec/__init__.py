"""The IPsec vocabulary every service shares: transform IDs, traffic selectors, SA records."""
