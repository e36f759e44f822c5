import BitmapStore
import QCowImage

/// The checker's contributors: metadata that QCowImage does not own itself.
enum CheckContributors {
    /// Bitmap directory, tables and data clusters, and the bitmap rules of the spec.
    static var all: [CheckContributor] { [bitmaps(_:)] }

    static func bitmaps(_ file: QCowFile) throws -> CheckContribution {
        let report = try BitmapCatalog.check(file)
        let references = report.ownedClusters.map {
            CheckContribution.Reference(offset: $0.offset, length: UInt64($0.count) * UInt64(file.clusterSize),
                                        region: $0.what)
        }
        let findings = report.findings.map { f -> CheckReport.Finding in
            let severity: CheckReport.Finding.Severity
            switch f.severity {
            case .error: severity = .corruption
            case .warning: severity = .warning
            }
            return CheckReport.Finding(severity, region: f.region, offset: f.offset,
                                       f.bitmap.map { "bitmap '\($0)': \(f.message)" } ?? f.message)
        }
        return CheckContribution(references: references, findings: findings)
    }
}
