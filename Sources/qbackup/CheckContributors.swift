import QCowImage

/// The checker's contributors: metadata that QCowImage does not own itself.
enum CheckContributors {
    static var all: [CheckContributor] { [] }
}
