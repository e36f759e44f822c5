import ArgumentParser
import BitmapStore
import QCowImage

/// `qbackup check IMAGE [--repair leaks|all]` — qemu-img check's statuses.
struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check an image's metadata: refcounts against every reference, overlaps, alignment, flags.",
        discussion: """
            Exit status as qemu-img check: 0 no errors, 1 the check could not complete, \
            2 corruptions found, 3 only leaked clusters found. --repair leaks frees leaked \
            clusters; --repair all also fixes refcounts that are too low (rebuilding the \
            refcount structure if it must) and clears the corrupt and dirty bits.
            """)

    @Argument(help: "The qcow2 image file.", completion: .file()) var image: String

    @Option(name: [.short, .long], help: "Repair: leaks or all.")
    var repair: QCowChecker.RepairMode?

    @OptionGroup var options: GlobalOptions
    @OptionGroup var share: ShareOptions

    func validate() throws {
        if share.forceShare && repair != nil {
            throw ValidationError("-U/--force-share reads without the image lock, so it cannot be combined with --repair")
        }
    }

    func run() throws {
        try ExitStatus.run(json: options.json, errorStatus: ExitStatus.failure) {
            let mode = repair ?? .none
            share.warn([image])
            let file = try QCowChecker.open(image, repair: mode, lock: share.lock)
            defer { file.close() }
            var dropped: [String] = []
            if mode == .all {
                // Broken bitmaps go first (QEMU cannot open the image with them); their clusters become leaks.
                let result = try BitmapCatalog.repair(file)
                dropped = result.droppedExtension ? ["(the whole bitmaps extension)"] : result.dropped
                if !dropped.isEmpty { file.dropCachesAfterRepair() }
            }
            var report = try QCowChecker.check(file, repair: mode, contributors: CheckContributors.all)
            report.droppedBitmaps = dropped
            if options.json {
                JSONReport.set(Self.json(report))
            } else {
                emit(Self.human(report))
            }
            return report.exitStatus
        }
    }

    static func json(_ r: CheckReport) -> JSON {
        var pairs: [(String, JSON)] = [
            ("image-end-offset", .uint(r.imageEndOffset)), ("total-clusters", .uint(r.totalClusters)),
            ("check-errors", .int(Int64(r.checkErrors))), ("allocated-clusters", .uint(r.allocatedClusters)),
            ("filename", .string(r.filename)), ("format", .string("qcow2")),
            ("fragmented-clusters", .uint(r.fragmentedClusters)), ("compressed-clusters", .uint(r.compressedClusters)),
        ]
        if r.corruptions > 0 { pairs.append(("corruptions", .int(Int64(r.corruptions)))) }
        if r.leaks > 0 { pairs.append(("leaks", .int(Int64(r.leaks)))) }
        if r.corruptionsFixed > 0 { pairs.append(("corruptions-fixed", .int(Int64(r.corruptionsFixed)))) }
        if r.leaksFixed > 0 { pairs.append(("leaks-fixed", .int(Int64(r.leaksFixed)))) }
        let findings: [JSON] = r.findings.map { f in
            var item: [(String, JSON)] = [("severity", .string(f.severity.rawValue)), ("region", .string(f.region))]
            if let offset = f.offset { item.append(("offset", .uint(offset))) }
            item.append(("message", .string(f.message)))
            return .object(item)
        }
        pairs.append(("findings", .array(findings)))
        if !r.droppedBitmaps.isEmpty { pairs.append(("bitmaps-removed", .array(r.droppedBitmaps.map { .string($0) }))) }
        return .object(pairs)
    }

    static func human(_ r: CheckReport) -> String {
        var out = ""
        for f in r.findings {
            let label = f.severity == .corruption ? "ERROR" : f.severity == .leak ? "Leaked" : "Warning"
            let at = f.offset.map { " at 0x" + String($0, radix: 16) } ?? ""
            out += "\(label): \(f.region)\(at): \(f.message)\n"
        }
        if r.findings.count < r.corruptions + r.leaks {
            out += "(\(r.corruptions + r.leaks - r.findings.count) more not listed)\n"
        }
        for name in r.droppedBitmaps { out += "Removed broken bitmap \(name).\n" }
        if r.corruptionsFixed + r.leaksFixed > 0 {
            out += "Repaired \(r.leaksFixed) leaked cluster(s) and \(r.corruptionsFixed) corruption(s).\n"
        }
        if r.corruptions == 0 && r.leaks == 0 && r.checkErrors == 0 {
            out += "No errors were found on the image.\n"
        }
        if r.corruptions > 0 {
            out += "\n\(r.corruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
        }
        if r.leaks > 0 {
            out += "\n\(r.leaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
        }
        if r.checkErrors > 0 {
            out += "\n\(r.checkErrors) internal errors have occurred during the check.\n"
        }
        // As qemu-img: allocated of all clusters, fragmented and compressed of the allocated ones;
        // no line at all for an image with nothing allocated.
        if r.totalClusters > 0 && r.allocatedClusters > 0 {
            let pct = { (n: UInt64, of: UInt64) in String(printf: "%.2f", Double(n) * 100 / Double(of)) }
            out += "\(r.allocatedClusters)/\(r.totalClusters) = \(pct(r.allocatedClusters, r.totalClusters))% allocated, "
                + "\(pct(r.fragmentedClusters, r.allocatedClusters))% fragmented, "
                + "\(pct(r.compressedClusters, r.allocatedClusters))% compressed clusters\n"
        }
        out += "Image end offset: \(r.imageEndOffset)\n"
        return out
    }
}

extension QCowChecker.RepairMode: ExpressibleByArgument {}
