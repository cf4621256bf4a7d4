"""The test suite; its folders mirror the pack's packages (see CONTRIBUTING.md, "Layout")."""
