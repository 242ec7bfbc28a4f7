"""The pipeline: process events and drained records in, symbolized stacks out, into
profiles."""
