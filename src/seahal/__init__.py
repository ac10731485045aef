"""seahal: a hardware-abstraction layer for DeepSeek-V4-class operators.

Subpackages: ``seahal.hal`` (contracts, registry, plans), ``seahal.backends`` (cpu, cuda, ascend,
cambricon), ``seahal.model`` (the model graph), ``seahal.testing`` (the conformance suite).
"""

__version__ = "0.1.0"
