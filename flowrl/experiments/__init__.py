"""Experiments built on the trainer's pieces (flowrl.model / rollout / algorithms / tasks): see each module."""
