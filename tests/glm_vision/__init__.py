"""The `glm` vision backend on a tiny random GLM-4.6V-shaped checkpoint (`conftest.py` builds it once for the
package), through the real processor and model classes."""
