import BitmapStore
import FoundationEssentials
import QCowImage

/// DESIGN "Damaged images": a read-only command whose work did not need the damaged
/// structure still succeeds, and says so in one `qbackup: warning:` line per damaged
/// file (the first problem `check` finds), so the user knows to run `check`.
enum DamageWarnings {
    /// The warnings (without the `qbackup: warning:` prefix) for the qcow2 files of `images` and their backing chains, each file once.
    static func lines(for images: [GuestImage]) -> [String] {
        var seen: Set<String> = []
        var out: [String] = []
        for image in images {
            for case let file as QCowFile in image.chain where seen.insert(file.filename).inserted {
                if let line = BitmapCatalog.damageWarning(for: file) { out.append(line) }
            }
        }
        return out
    }

    /// Writes the warning lines for `images` to stderr.
    static func emit(for images: [GuestImage]) {
        for line in lines(for: images) { warning(line) }
    }
}
