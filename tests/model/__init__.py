"""Model tests: a real GGUF model loaded through llama-cpp-python, in process or in one worker."""
