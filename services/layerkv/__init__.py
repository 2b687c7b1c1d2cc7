"""layerkv: LLM serving on Kubernetes that keeps time-to-first-token low for long prompts."""
