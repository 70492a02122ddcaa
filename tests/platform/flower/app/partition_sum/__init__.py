"""One trivial round on the Message API: each ClientApp reports its partition id."""
