"""IKEv2 authentication: identities, PSK (§2.15), certificate signatures (RFC 7427), trust."""
