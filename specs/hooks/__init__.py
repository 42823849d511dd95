"""Small named functions that mode specs refer to: guards, effects, roles, readiness, evaluators.

Hooks decide; they never touch storage, locks or the wire. See `context.py` for what they receive.
"""
