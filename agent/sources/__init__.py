"""Agent sources: one module per hardware source, all behind agent.sources.base.Source."""
