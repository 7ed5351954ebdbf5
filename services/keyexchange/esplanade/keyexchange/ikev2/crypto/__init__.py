"""IKEv2 cryptography: PRFs and key derivation, key exchange methods, SK payload protection."""
