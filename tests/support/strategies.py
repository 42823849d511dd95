"""Hypothesis strategies more than one test module draws from."""
from __future__ import annotations

from hypothesis import strategies as st
from macp.v1 import core_pb2

# CommitmentPayload's string fields (RFC-MACP-0001's commitment), written out here rather than taken from
# the module under test
COMMITMENT_STRINGS = ("commitment_id", "action", "authority_scope", "reason", "mode_version", "policy_version",
                      "configuration_version")


def texts(max_size: int):
    """Any Unicode text without lone surrogates (protobuf strings must be valid UTF-8)."""
    return st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=max_size)


@st.composite
def commitment_payloads(draw, max_size: int = 24):
    """A CommitmentPayload with random strings and outcome, half of them superseding a random earlier one."""
    text = texts(max_size)
    p = core_pb2.CommitmentPayload(**{name: draw(text) for name in COMMITMENT_STRINGS},
                                   outcome_positive=draw(st.booleans()))
    if draw(st.booleans()):
        p.supersedes.SetInParent()
        p.supersedes.session_id = draw(text)
        p.supersedes.commitment_hash = draw(text)
    return p
