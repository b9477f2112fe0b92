"""One study's store: objects, manifests, index, tree. Imports only eidetic.core."""
