"""Code that talks to language models, shared by the stages that need one (annotate, evaluate).

- :mod:`perpair.llm.client`: an asynchronous client for OpenAI-compatible chat endpoints (retries, back-off,
  bounded concurrency, several base URLs, usage and cost accounting, logprobs, structured output).
- :mod:`perpair.llm.scoring`: likelihood scoring of a fixed set of options after a prompt with a local
  Hugging Face causal LM, batched.

Neither module knows anything about annotation or evaluation.
"""

from perpair.llm.client import ChatClient, ChatClientConfig, ChatError, ChatResult, ClientStats

__all__ = ["ChatClient", "ChatClientConfig", "ChatError", "ChatResult", "ClientStats"]
