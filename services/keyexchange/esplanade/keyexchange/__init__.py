"""keyexchange: IKEv2 (RFC 7296) negotiation of IKE and Child SAs."""
