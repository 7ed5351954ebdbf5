"""Scale-out building blocks shared by the services: rendezvous hashing, lease clocks, owner records."""
