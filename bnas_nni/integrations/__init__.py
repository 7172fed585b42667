"""bnas-nni's integrations with the tools around it (named so that none shadows the library it integrates)."""
