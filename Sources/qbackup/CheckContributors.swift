import BitmapStore
import QCowImage

/// The checker's contributors: metadata that QCowImage does not own itself.
enum CheckContributors {
    /// Bitmap directory, tables and data clusters, and the bitmap rules of the spec.
    static var all: [CheckContributor] { [BitmapCatalog.checkContribution(_:)] }
}
