"""One class per IKEv2 exchange step, as strongSwan's libcharon/sa/ikev2/tasks."""
