import QCowImage

// MARK: - Damaged images (DESIGN.md, "Damaged images")

extension BitmapCatalog {
    /// The bitmaps' part of `check`: the clusters bitmaps own and what is wrong with
    /// them, as a contributor for `QCowChecker` (errors count as corruptions).
    public static func checkContribution(_ file: QCowFile) throws -> CheckContribution {
        let report = try check(file)
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

    /// The first problem `check` finds in `file`'s metadata, bitmaps included, or nil
    /// when it has none (leaks and warnings, an in_use bitmap among them, are no damage).
    public static func firstDamage(in file: QCowFile) throws -> QCowError? {
        let report = try QCowChecker.check(file, contributors: [checkContribution])
        guard report.corruptions > 0 || report.checkErrors > 0 else { return nil }
        guard let finding = report.findings.first(where: { $0.severity == .corruption }) else {
            return QCowError(.corrupt, "the metadata could not be checked completely", path: file.filename)
        }
        var more = ""
        if report.corruptions > 1 { more = " (and \(report.corruptions - 1) more problem(s))" }
        return QCowError(.corrupt, finding.message + more, path: file.filename, offset: finding.offset,
                         region: finding.region)
    }

    /// DESIGN "Damaged images": the one warning a read-only command prints when `file`'s
    /// metadata is damaged (its first problem, as `check` finds it), or nil when it is not.
    public static func damageWarning(for file: QCowFile) -> String? {
        guard let damage = (try? firstDamage(in: file)) ?? nil else { return nil }
        return "\(damage); run 'qbackup check'"
    }

    /// Refuses, before anything is written, an image whose metadata is damaged
    /// anywhere: every command that writes an image calls this first, so bad
    /// input is never written (`check --repair` is the one writer of a damaged image).
    public static func requireUndamaged(_ file: QCowFile) throws {
        guard var damage = try firstDamage(in: file) else { return }
        damage.message += "; the image is damaged, so nothing was written: run 'qbackup check' (and 'qbackup check --repair all')"
        throw damage
    }
}
