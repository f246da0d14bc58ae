"""HTTP every remote endpoint shares: retries, backoff and error reading (``transport``), and the JSON client."""
