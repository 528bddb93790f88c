"""Summary in, text out: terminal, Markdown, HTML, gates. No index, no model."""
