"""Several instances over one PostgreSQL database, and the PostgreSQL store itself."""
