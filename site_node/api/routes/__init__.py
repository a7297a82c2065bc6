"""One APIRouter per resource of the site API."""
