"""``meav data synthesize``: personas → queries → three-level responses from an LLM (the MEAV paper's pipeline).

``prompts`` holds every prompt, ``filters`` the clean-up, ``llm_client`` the backends, ``pipeline`` the run.
"""
