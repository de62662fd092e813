"""Shared pieces of the paper's runners (configs, metrics, run folders). Examples only: the runners
import the library through its public API (``import gpart``) and nothing else from it."""
