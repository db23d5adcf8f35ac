"""The seed caption model: architecture, checkpoint loading, and a fast batched generation engine."""
