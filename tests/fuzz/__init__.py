"""The descriptor-driven fuzzer of SPEC 10.13."""
