"""Per-pair plans inside other training libraries. Each integration is an optional extra:
``perpair.integrations.trl`` needs ``pip install perpair[trl]``."""
