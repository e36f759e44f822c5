import ArgumentParser
import BitmapStore
import FoundationEssentials
import QCowImage

/// `qbackup bitmap list|add|remove|clear|enable|disable|merge|dump` — persistent dirty bitmaps.
struct BitmapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bitmap",
        abstract: "List, add, remove, clear, enable, disable, merge and dump persistent dirty bitmaps.",
        discussion: """
            Works like 'qemu-img bitmap'. A bitmap marked in_use (inconsistent) can only be listed, \
            dumped or removed.
            """,
        subcommands: [List.self, Add.self, Remove.self, Clear.self, Enable.self, Disable.self, Merge.self, Dump.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list",
            abstract: "Show each bitmap: name, granularity, enabled (auto), in_use, dirty bytes.")
        @Argument(help: "The qcow2 image.", completion: .file()) var image: String
        @OptionGroup var options: GlobalOptions
        @OptionGroup var share: ShareOptions

        func run() throws {
            try ExitStatus.run(json: options.json) {
                var warnings: [String] = []
                share.warn([image])
                let rows = try BitmapCatalog.withCatalog(image, writable: false, lock: share.lock) { catalog in
                    let rows = try catalog.list()
                    warnings = DamageWarnings.lines(for: [catalog.file])
                    return rows
                }
                for line in warnings { warning(line) }
                if options.json {
                    JSONReport.set(.object([("bitmaps", .array(rows.map(List.json)))]))
                } else {
                    let width = max(24, (rows.map(\.name.count).max() ?? 0) + 2)
                    emit("NAME".padding(width) + "GRANULARITY".padding(13) + "ENABLED".padding(9) + "IN_USE".padding(8) + "DIRTY\n")
                    for row in rows {
                        let dirty = row.dirtyBytes.map(humanSize) ?? "- (inconsistent)"
                        emit(row.name.padding(width) + humanSize(row.granularity).padding(13) + (row.enabled ? "yes" : "no").padding(9)
                             + (row.inUse ? "yes" : "no").padding(8) + dirty + "\n")
                    }
                }
                return 0
            }
        }

        static func json(_ row: BitmapSummary) -> JSON {
            var pairs: [(String, JSON)] = [("name", .string(row.name)), ("granularity", .uint(row.granularity)),
                                           ("enabled", .bool(row.enabled)), ("in-use", .bool(row.inUse)),
                                           ("dirty-bytes", row.dirtyBytes.map { .uint($0) } ?? .null)]
            if let why = row.inconsistency { pairs.append(("inconsistent", .string(why.description))) }
            return .object(pairs)
        }
    }

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "add", abstract: "Add a new empty bitmap, enabled unless --disabled.")
        @Argument(help: "The qcow2 image.", completion: .file()) var image: String
        @Argument(help: "The bitmap's name.") var name: String
        @Option(name: [.short, .long], parsing: .unconditional,
                help: "Bytes per bit (K/M suffixes; default: the cluster size clamped to 4K-64K).",
                transform: parseGranularity)
        var granularity: UInt64?
        @Flag(help: "Add the bitmap disabled (not tracking writes).") var disabled = false
        @OptionGroup var options: GlobalOptions

        func run() throws {
            try edit(image, name, "add", options) { try $0.add(name, granularity: granularity, enabled: !disabled) }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "remove", abstract: "Remove a bitmap and free its clusters.")
        @Argument(help: "The qcow2 image.", completion: .file()) var image: String
        @Argument(help: "The bitmap's name.") var name: String
        @OptionGroup var options: GlobalOptions
        func run() throws { try edit(image, name, "remove", options) { try $0.remove(name) } }
    }

    struct Clear: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "clear", abstract: "Mark every byte of a bitmap clean.")
        @Argument(help: "The qcow2 image.", completion: .file()) var image: String
        @Argument(help: "The bitmap's name.") var name: String
        @OptionGroup var options: GlobalOptions
        func run() throws { try edit(image, name, "clear", options) { try $0.clear(name) } }
    }

    struct Enable: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "enable", abstract: "Make a bitmap track writes (set auto).")
        @Argument(help: "The qcow2 image.", completion: .file()) var image: String
        @Argument(help: "The bitmap's name.") var name: String
        @OptionGroup var options: GlobalOptions
        func run() throws { try edit(image, name, "enable", options) { try $0.enable(name) } }
    }

    struct Disable: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "disable", abstract: "Stop a bitmap tracking writes (clear auto).")
        @Argument(help: "The qcow2 image.", completion: .file()) var image: String
        @Argument(help: "The bitmap's name.") var name: String
        @OptionGroup var options: GlobalOptions
        func run() throws { try edit(image, name, "disable", options) { try $0.disable(name) } }
    }

    struct Merge: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "merge",
            abstract: "TARGET |= each --source bitmap.",
            discussion: """
                Sources are bitmaps of IMAGE, or of --source-image (given once: for every source; given as \
                many times as --source: one per source). Source images must have IMAGE's virtual size; \
                any granularity is converted.
                """)
        @Argument(help: "The qcow2 image.", completion: .file()) var image: String
        @Argument(help: "The bitmap to merge into.") var target: String
        @Option(name: .long, help: "A source bitmap (repeatable).") var source: [String] = []
        @Option(name: .long, help: "The image holding the sources (repeatable).", completion: .file()) var sourceImage: [String] = []
        @OptionGroup var options: GlobalOptions

        func validate() throws {
            guard !source.isEmpty else { throw ValidationError("merge needs at least one --source") }
            guard sourceImage.count <= 1 || sourceImage.count == source.count else {
                throw ValidationError("give --source-image once, or once per --source")
            }
        }

        func run() throws {
            // Each source's image: IMAGE, the one --source-image, or its own --source-image.
            let pairs = source.indices.map { (path: sourceImage.isEmpty ? image : sourceImage[sourceImage.count == 1 ? 0 : $0],
                                              name: source[$0]) }
            let local = pairs.filter { $0.path == image }.map(\.name)
            let foreign = pairs.filter { $0.path != image }
            let sources = JSON.array(pairs.map { .object([("image", .string($0.path)), ("name", .string($0.name))]) })
            try ExitStatus.run(json: options.json) {
                let loaded = try foreign.map { f in try BitmapCatalog.withCatalog(f.path, writable: false) { try $0.load(f.name) } }
                try apply(image, target, "merge", options, extra: [("sources", sources)]) { catalog in
                    try catalog.merge(into: target, bitmaps: try local.map { try catalog.load($0) } + loaded)
                }
                return 0
            }
        }
    }

    struct Dump: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "dump",
            abstract: "Show a bitmap's extents over the whole disk.",
            discussion: """
                With --output json: [{"start":0,"length":131072,"dirty":true}, ...], in order, adjacent \
                extents of the same state merged — the extents nbdinfo --map=qemu:dirty-bitmap:NAME shows.
                """)
        @Argument(help: "The qcow2 image.", completion: .file()) var image: String
        @Argument(help: "The bitmap's name.") var name: String
        @OptionGroup var options: GlobalOptions
        @OptionGroup var share: ShareOptions

        func run() throws {
            try ExitStatus.run {
                var warnings: [String] = []
                share.warn([image])
                let dump = try BitmapCatalog.withCatalog(image, writable: false, lock: share.lock) { catalog in
                    let dump = try catalog.dump(name)
                    warnings = DamageWarnings.lines(for: [catalog.file])
                    return dump
                }
                for line in warnings { warning(line) }
                if let inconsistent = dump.warning { warning(inconsistent) }
                if options.json {
                    var first = true
                    emit("[")
                    for e in dump.bitmap.extents() {
                        emit((first ? "" : ",\n") + "{\"start\":\(e.start),\"length\":\(e.length),\"dirty\":\(e.dirty)}")
                        first = false
                    }
                    emit("]\n")
                } else {
                    emit("Offset          Length          State\n")
                    for e in dump.bitmap.extents() {
                        emit(hex(e.start).padding(16) + hex(e.length).padding(16) + (e.dirty ? "dirty" : "clean") + "\n")
                    }
                }
                return 0
            }
        }
    }
}

/// Runs one bitmap operation on bitmap NAME of IMAGE (`apply`) as a command.
private func edit(_ image: String, _ name: String, _ operation: String, _ options: GlobalOptions,
                  _ body: @escaping (BitmapCatalog) throws -> Void) throws {
    try ExitStatus.run(json: options.json) {
        try apply(image, name, operation, options, body)
        return 0
    }
}

/// Opens IMAGE writable and runs one bitmap operation on bitmap NAME; with --output json it reports
/// `{"operation", "image", "name", "bitmap": the bitmap as 'bitmap list' shows it afterwards (null once
/// removed), extra…}`.
private func apply(_ image: String, _ name: String, _ operation: String, _ options: GlobalOptions,
                   extra: [(String, JSON)] = [], _ body: @escaping (BitmapCatalog) throws -> Void) throws {
    let row = try BitmapCatalog.withCatalog(image, writable: true) { catalog in
        try body(catalog)
        return options.json ? try catalog.list().first { $0.name == name } : nil
    }
    if options.json {
        JSONReport.set(.object([("operation", .string(operation)), ("image", .string(image)), ("name", .string(name)),
                                ("bitmap", row.map(BitmapCommand.List.json) ?? .null)] + extra))
    }
}
