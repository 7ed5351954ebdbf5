"""Zero-trust access policy: model, evaluator, incremental compiler, policy as code (docs/policy.md)."""
