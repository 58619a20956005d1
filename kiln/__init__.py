"""kiln: a compiler-centric LLM inference stack on Apache TVM."""

__version__ = "0.1.0"
