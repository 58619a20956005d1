"""Helpers the passes share (graph views, linear finding and merging, serving-function builders). Not passes."""
