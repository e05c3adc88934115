# The README's two commands, spelled out for make users.
.PHONY: demo test
demo:
	pip install -e ".[demo]" && textcl demo
test:
	pip install -e ".[test]" && python -m pytest
