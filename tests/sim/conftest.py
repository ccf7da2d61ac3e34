import pytest

from esp_core.sched.cost_model import CostModel


@pytest.fixture(scope="session")
def cost_model():
    """The shipped A800 / Llama-2-7B profile, as the CLI uses by default."""
    return CostModel.default_a800()
