"""Federated rounds with a fake coordinator and fake sites (see the e2e tests)."""
