"""One module per kind of server: OpenAI-compatible chat (vLLM, SGLang, llama.cpp's servers, APIs), TGI and HF
Inference Providers (huggingface_hub's client), raw completions for a scorer, and llama.cpp in this process."""
