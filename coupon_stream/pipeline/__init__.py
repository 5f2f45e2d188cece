"""The stages in flow order: intake -> state_stage -> checkpoint -> sink."""
