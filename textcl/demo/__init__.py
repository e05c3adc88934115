"""`textcl demo`: the embedded default on bundled data (see `textcl.demo.run`)."""
