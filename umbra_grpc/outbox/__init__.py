"""Push delivery (ntfy) from the transactional outbox."""
