"""Testing tools shared by seahal's tests and by vendors proving a backend: small valid example
arguments for every op (:mod:`seahal.testing.examples`) and the conformance suite."""
