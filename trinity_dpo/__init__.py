"""trinity-dpo: offline DPO for chat LLMs, driven by a Trinity-RFT style YAML (`trinity run --config dpo.yaml`)."""

__version__ = "0.1.0"
