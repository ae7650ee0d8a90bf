//! Service configuration and the map.
